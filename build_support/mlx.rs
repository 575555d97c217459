//! Build support for the MLX binding (filled in by the binding work).
pub fn build() {}
