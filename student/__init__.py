"""The student side: stream a cache, replay views, distil with KD, ViTKD or ScaleKD."""

from . import models  # noqa: F401  (registers the digits-sized students with timm's model registry)
