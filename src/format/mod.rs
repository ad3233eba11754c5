//! The .flashpack v1 format in code: formats/flashpack-v1.md.
