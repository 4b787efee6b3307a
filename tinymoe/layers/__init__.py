"""The math of the model, one concept per module, each forward directly above its backward."""
