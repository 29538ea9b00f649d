"""mitmproxy script: `mitmdump -s addons/casb.py [--set casb_config=casb.yaml]`.

All logic lives in the casb package (installed in .venv by `make run` / `make test`);
this file only hands mitmproxy the addon.
"""

import os
import sys

# mitmproxy puts this script's folder first on sys.path, where this very file would
# shadow the `casb` package; look for the package everywhere else.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from casb.mitm_addon import CasbAddon  # noqa: E402

addons = [CasbAddon()]
