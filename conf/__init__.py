"""The config groups of rl-loss, installed as the package ``rl_loss_conf`` (Hydra: ``pkg://rl_loss_conf``)."""
