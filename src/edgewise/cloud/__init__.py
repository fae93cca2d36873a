"""The control plane: device and operator APIs, ingest, fleet registry, config, PKI glue.

`app` builds the aiohttp application from the APIs (`device_api`, `operator_api`), which use the
shared state below them (`state`, `config`), the services (`desired`, `sessions`, `ingest`,
`dataout`, `retention`) and the `store`; the module map is in docs/control-plane.md.
"""

from edgewise.common.extras import require_extra

require_extra("cloud", "the control plane (edgewise.cloud)")
