"""Product-key memory layers: their config (config.py), retrieval (steps
1-5, retrieval.py), the stages (retrieval and weighting in stages.py, value
read and output in readout.py; step 6's reference is
pallas_kernels/reference.py), the one mapping of model.memory to stages
(recipe.py), the module that runs them (layer.py) and the paper's
initialisation (init.py). This file imports nothing, so that the config can
be read without the layer."""
