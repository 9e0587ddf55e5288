"""In-process scale experiment: every method on identical clients, data and θ0, plus unlearning costs."""

from sift_fl.experiment.config import ExperimentConfig
from sift_fl.experiment.methods import ALL_METHODS, METHODS, parse_methods
from sift_fl.experiment.runner import run_experiment

__all__ = ["ALL_METHODS", "METHODS", "ExperimentConfig", "parse_methods", "run_experiment"]
