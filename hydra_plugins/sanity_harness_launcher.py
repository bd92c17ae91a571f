"""Hydra instantiates launchers only from the ``hydra_plugins`` namespace: this module names the
harness's SLURM launcher there (``conf/hydra/launcher/slurm.yaml``); its code is
``harness/launcher.py``."""
from harness.launcher import WaitingSlurmLauncher


class SlurmLauncher(WaitingSlurmLauncher):
    """hydra-submitit-launcher's ``submitit_slurm`` that waits for every job (also cancelled or
    killed ones, without SLURM accounting) and does not resubmit jobs finished earlier."""
