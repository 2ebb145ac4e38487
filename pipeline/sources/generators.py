"""One name per generator: the names each source format gives map to one canonical name, so
`CompVis/stable-diffusion-v1-4`, `Stable Diffusion 1.4` and `sd-1.4` are one generator in every table.

Canonical names: `sd-1.4`, `sd-1.5`, `sd-2.1`, `sd-xl`, `deepfloyd-if` (and `real` for photographs).
Where each format's names come from:
- D3 Parquet: `model_gen{k}`, the Hugging Face model id of column `image_gen{k}`
  (`DeepFloyd/IF-I-M-v1.0`, `stabilityai/stable-diffusion-2-1`, …).
- D3 webdataset (`gen_{k}` members) and the reference code's h5 (`image_gen{k}` datasets) carry no
  names: `--generators` gives them, in the order of D3's `model_gen0..3` (`DEFAULT_GENERATORS` in
  `pipeline.sources.d3`). The slot (`gen_0`, or the name given) is kept as `generator_original`.
- Folders, webdataset `--generator`, manifests and clip-retrieval labels: the name as written,
  e.g. a class folder `stable_diffusion_v_1_4/` (GenImage), `stable-diffusion-1-4/` (Synthbuster).
Names are compared in lower case with spaces and underscores read as `-`. Names not in the table
are kept as given (stripped): a generator this table does not know still gets its own rows. The
name a source gave is kept beside the canonical one in the samples column `generator_original`.
"""

from __future__ import annotations

import re
from functools import lru_cache

# canonical name → the spellings that mean it (compared after `_key`: lower case, no spaces or underscores)
ALIASES: dict[str, tuple[str, ...]] = {
    "sd-1.4": ("sd-1.4", "sd1.4", "sd14", "sdv1.4", "sd-v1-4", "sd-v1.4", "stable-diffusion-v1-4",
               "stable-diffusion-1.4", "stable-diffusion-v1.4", "stable-diffusion-1-4", "stable-diffusion-v-1-4",
               "compvis/stable-diffusion-v1-4"),
    "sd-1.5": ("sd-1.5", "sd1.5", "sd15", "sdv1.5", "sd-v1-5", "sd-v1.5", "stable-diffusion-v1-5",
               "stable-diffusion-1.5", "stable-diffusion-v1.5", "stable-diffusion-1-5", "stable-diffusion-v-1-5",
               "runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "sd-2.1": ("sd-2.1", "sd2.1", "sd21", "sdv2.1", "sd-v2-1", "sd-v2.1", "stable-diffusion-2-1",
               "stable-diffusion-2.1", "stable-diffusion-v2.1", "stable-diffusion-2-1-base",
               "stabilityai/stable-diffusion-2-1", "stabilityai/stable-diffusion-2-1-base"),
    "sd-xl": ("sd-xl", "sdxl", "sd-xl-1.0", "sdxl-1.0", "sd-xl-base-1.0", "stable-diffusion-xl",
              "stable-diffusion-xl-1.0", "stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
    "deepfloyd-if": ("deepfloyd-if", "deepfloyd", "if", "deepfloyd/if-i-m-v1.0", "deepfloyd/if-i-l-v1.0",
                     "deepfloyd/if-i-xl-v1.0", "if-i-m-v1.0", "if-i-l-v1.0", "if-i-xl-v1.0"),
}


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


_LOOKUP: dict[str, str] = {_key(alias): canon for canon, aliases in ALIASES.items() for alias in aliases}


@lru_cache(maxsize=4096)  # a source repeats a handful of names millions of times (D3: 4 per row)
def canonical(name: str) -> str:
    """The canonical name of a generator (`real` for real images); unknown names are kept as given."""
    stripped = name.strip()
    return _LOOKUP.get(_key(stripped), stripped)
