"""The 8-device checks' XLA flags: imported by each check script before it imports jax.

Eight host devices share the machine's cores with the other test workers, so
the participants of one collective can arrive far apart: the collective
timeouts are raised from XLA's 40 s default to 10 minutes (a slow run, not a
hang, must not abort the check).
"""

import os

os.environ["XLA_FLAGS"] = (
  "--xla_force_host_platform_device_count=8"
  " --xla_cpu_collective_call_terminate_timeout_seconds=600"
  " --xla_cpu_collective_timeout_seconds=600"
)
