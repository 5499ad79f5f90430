"""``sgm.modules.GeneralConditioner`` is the configs' path of the conditioner."""
from sgm.modules.encoders.modules import GeneralConditioner  # noqa: F401

__all__ = ["GeneralConditioner"]
