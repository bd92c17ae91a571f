"""Hydra instantiates launchers only from the ``hydra_plugins`` namespace: this module names the
harness's SLURM launcher there (``conf/hydra/launcher/slurm.yaml``). Hydra imports every plugin
module at startup, so the harness is imported only when a sweep is launched; the code is
``harness/launcher.py``."""
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _Submitit


class SlurmLauncher(_Submitit):
    """hydra-submitit-launcher's ``submitit_slurm`` that waits for every job (also cancelled or
    killed ones, without SLURM accounting) and does not resubmit jobs finished earlier."""

    def launch(self, job_overrides, initial_job_idx):
        from harness.launcher import launch

        return launch(self, job_overrides, initial_job_idx)
