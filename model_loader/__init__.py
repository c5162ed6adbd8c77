"""Find, download, validate and quantize the two models, plan GPU memory, and build engines.

Nothing here imports lmdeploy or touches the network at import time.
"""
