"""Graph passes, each a rule per control-flow op kind (see `traversal.GraphPass`). Their
order, and why, is in `pipeline.py`."""
