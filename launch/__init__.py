"""Launchers: TPU VMs / queued resources (gcloud), GKE via XPK, Slurm GPU clusters. See docs/launch.md."""
