"""Product-key memory layers: their config (config.py), retrieval (steps
1-5, retrieval.py), values (step 6, values.py), the module (layer.py) and the
paper's initialisation (init.py). This file imports nothing, so that the
config can be read without the layer."""
