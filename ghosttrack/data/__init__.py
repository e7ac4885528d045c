"""Text and models: corpora and token packing, models and hookpoints, the sharded activation store. Imports core."""
