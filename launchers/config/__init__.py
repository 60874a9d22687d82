"""The launcher's configuration: the RunConfig models, the Hydra config store, the checks run before any work."""
