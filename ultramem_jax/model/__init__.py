"""The decoder-only Transformer (transformer.py) and the layers that fill its
FFN slot (ffn.py, moe.py, memory/). Import the modules themselves: this file
imports nothing, so that importing a config (model/config.py) does not build
the whole model."""
