//! Mesh simulation helpers.
