"""The machinery behind asen.py: training and evaluation loops, checkpoints, configuration, the
input pipeline, ASEN++'s crop and stages, Zappos50k, result tables and pictures. The method itself
(the networks and their losses) is model.py; the data, datasets.py; plumbing, utils.py."""
