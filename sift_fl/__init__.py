"""sift-fl: exact unlearning for federated finetuning with sign-fixed tuning and masked merging."""

__version__ = "0.1.0"
