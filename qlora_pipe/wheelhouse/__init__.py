"""`qlora-pipe wheelhouse DIR`: the wheels a machine with no network lacks, for another Python and platform.

API: ``Target`` (the machine the wheels are for: Python version, platform tags, what it already has),
``read_have`` (``NAME==VERSION`` items and ``pip freeze`` files), ``project_requirements`` (the project's own
ranges for the GPU check or the whole pipeline) and ``build_wheelhouse`` (resolve by hand, one version per
package, download each wheel with ``pip download --no-deps``, write ``wheelhouse.json``).
"""

from qlora_pipe.wheelhouse.resolve import Wheel, build_wheelhouse, project_requirements
from qlora_pipe.wheelhouse.target import Target, read_have

__all__ = ["Target", "Wheel", "build_wheelhouse", "project_requirements", "read_have"]
