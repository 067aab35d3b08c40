"""The DomainBed-facing plugin: the algorithms and their registry, hyperparameters, the shared
featurizer and checkpoints, DomainBed's data as train.py builds it, the offline dataset, the
submitit launcher, and the registration into DomainBed's modules."""
