"""Device mesh and the logical-axis rules that place every parameter."""
