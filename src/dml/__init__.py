"""Deep metric learning experiments."""
