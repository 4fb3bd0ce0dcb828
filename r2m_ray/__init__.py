"""r2m-ray: distributed RLHF with generalisable, policy-aligned reward models on Ray."""

import os as _os

# Ray reads this once, when `ray` is first imported: with it at 0 a locally started Ray
# binds every socket to 127.0.0.1 instead of the machine's public interface (measured on
# Ray 2.60). It only affects nodes this process starts itself, never a cluster it joins.
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

__version__ = "0.1.0"
