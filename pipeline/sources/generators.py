"""One name per generator: Hugging Face model ids and the short names people type map to one
canonical name, so `CompVis/stable-diffusion-v1-4` and `sd-1.4` are one generator in every table.

Names not in the table are kept as given (stripped). The name a source gave is kept beside the
canonical one in the samples column `generator_original`.
"""

from __future__ import annotations

import re

# canonical name → the spellings that mean it (compared after `_key`: lower case, no punctuation)
ALIASES: dict[str, tuple[str, ...]] = {
    "sd-1.4": ("sd-1.4", "sd1.4", "sd14", "sdv1.4", "sd-v1-4", "stable-diffusion-v1-4",
               "stable-diffusion-1.4", "compvis/stable-diffusion-v1-4"),
    "sd-1.5": ("sd-1.5", "sd1.5", "sd15", "sdv1.5", "sd-v1-5", "stable-diffusion-v1-5",
               "stable-diffusion-1.5", "runwayml/stable-diffusion-v1-5",
               "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "sd-2.1": ("sd-2.1", "sd2.1", "sd21", "sdv2.1", "sd-v2-1", "stable-diffusion-2-1",
               "stable-diffusion-2.1", "stabilityai/stable-diffusion-2-1",
               "stabilityai/stable-diffusion-2-1-base"),
    "sd-xl": ("sd-xl", "sdxl", "sd-xl-1.0", "sdxl-1.0", "stable-diffusion-xl",
              "stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
    "deepfloyd-if": ("deepfloyd-if", "deepfloyd", "if", "deepfloyd/if-i-m-v1.0", "deepfloyd/if-i-l-v1.0",
                     "deepfloyd/if-i-xl-v1.0", "if-i-m-v1.0", "if-i-l-v1.0", "if-i-xl-v1.0"),
}


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


_LOOKUP: dict[str, str] = {_key(alias): canon for canon, aliases in ALIASES.items() for alias in aliases}


def canonical(name: str) -> str:
    """The canonical name of a generator (`real` for real images); unknown names are kept as given."""
    stripped = name.strip()
    return _LOOKUP.get(_key(stripped), stripped)
