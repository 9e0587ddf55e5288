"""Runnable settings: data, label-skewed partition and a model with a fixed θ0."""

from __future__ import annotations

from sift_fl.settings.base import ClientData, Setting, Split, TrainConfig

SETTING_NAMES = ("digits", "bbc", "fmnist")


def get_setting(name: str, **options: object) -> Setting:
    """Return the setting called `name` ("digits", "bbc" or "fmnist")."""
    if name == "digits":
        from sift_fl.settings.digits import DigitsSetting

        return DigitsSetting(**options)  # type: ignore[arg-type]
    if name == "bbc":
        from sift_fl.settings.bbc import BbcSetting

        return BbcSetting(**options)  # type: ignore[arg-type]
    if name == "fmnist":
        from sift_fl.settings.fmnist import FashionMnistSetting

        return FashionMnistSetting(**options)  # type: ignore[arg-type]
    raise ValueError(f"unknown setting {name!r}; choose one of {', '.join(SETTING_NAMES)}")


__all__ = ["ClientData", "Setting", "Split", "TrainConfig", "get_setting", "SETTING_NAMES"]
