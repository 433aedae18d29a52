"""raysseg: AuxSegNet weakly supervised semantic segmentation, run as a distributed Ray application.

The core (everything outside `raysseg.distributed` and `raysseg.cli`) is plain torch / numpy and never
imports `ray`.
"""

__version__ = "0.1.0"
