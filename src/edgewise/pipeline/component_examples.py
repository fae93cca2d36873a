"""One example per built-in component, as it is written in a pipeline's YAML.

`edgewise components TYPE` prints them; a test builds a pipeline around each and validates it
with the spec loader, so an example cannot drift from the component's ``Config``. Sources read
nothing; stages and sinks take their input from a source with id ``sensors``.
"""

from __future__ import annotations

EXAMPLES: dict[tuple[str, str], str] = {
    ("source", "simulator"): """\
- id: sensors
  type: simulator
  profile: factory-line
  seed: 42
  limit: 100000          # stop after 100,000 readings
""",
    ("source", "file"): """\
- id: sensors
  type: file
  path: readings.ndjson  # relative to the pipeline file's folder
  follow: false
""",
    ("source", "mqtt"): """\
- id: sensors
  type: mqtt
  host: 127.0.0.1
  topics: [factory/+/readings]
  qos: 1
""",
    ("source", "http"): """\
- id: sensors
  type: http
  host: 0.0.0.0
  port: 8080
  path: /ingest
  token: change-me-to-a-long-secret
""",
    ("source", "modbus"): """\
- id: sensors
  type: modbus
  host: 192.168.1.50
  interval: 1s
  registers:
    - {name: line1/temp/001, address: 0, type: int16, scale: 0.1}
    - {name: line1/pressure/001, address: 2, type: float32}
""",
    ("source", "opcua"): """\
- id: sensors
  type: opcua
  endpoint: opc.tcp://192.168.1.60:4840
  nodes:
    - {node_id: "ns=2;i=2", sensor: line1/temp/001}
""",
    ("source", "stream"): """\
- id: sensors
  type: stream           # in a cloud pipeline only (edgewise cloud pipeline set)
  stream: ten-minute     # what the nodes' outbox sinks sent under this name
  nodes: {site: farm}    # of every node with these labels
  max_wait: 30s
""",
    ("operator", "filter"): """\
- id: hot
  type: filter
  inputs: [sensors]
  where: "value > 80 and startswith(sensor, 'line1/temp')"
""",
    ("operator", "map"): """\
- id: convert
  type: map
  inputs: [sensors]
  set: {fahrenheit: "value * 9 / 5 + 32"}
  drop: [value]
""",
    ("operator", "window"): """\
- id: windows
  type: window
  inputs: [sensors]
  key_by: [sensor]
  size: 1s
  aggregates: [count, mean, min, max]
""",
    ("operator", "partial"): """\
- id: site-stats
  type: partial          # the edge half of a split window
  inputs: [sensors]
  size: 10m
  key_by: []
  sketch: true           # carry a percentile sketch for p50/p95/p99 in the cloud
""",
    ("operator", "combine"): """\
- id: fleet-stats
  type: combine          # the cloud half: merges the sites' partials
  inputs: [sensors]
  size: 10m
  aggregates: [count, mean, min, max, stddev, p95]
""",
    ("operator", "deadband"): """\
- id: changes
  type: deadband
  inputs: [sensors]
  deadband: 0.5
  max_interval: 1m
""",
    ("operator", "threshold"): """\
- id: alarms
  type: threshold
  inputs: [sensors]
  field: value
  high: 100.0
""",
    ("operator", "rate_of_change"): """\
- id: ramp
  type: rate_of_change
  inputs: [sensors]
  per: 1m
  limit: 5.0
""",
    ("operator", "anomaly"): """\
- id: unusual
  type: anomaly
  inputs: [sensors]
  z: 4.0
""",
    ("operator", "downsample"): """\
- id: per-second
  type: downsample
  inputs: [sensors]
  interval: 1s
  how: last
""",
    ("operator", "fft"): """\
- id: vib
  type: fft
  inputs: [sensors]
  samples: 1024
  sample_rate: 2048
  bands: [[0, 100], [100, 400], [400, 1024]]
""",
    ("operator", "python"): """\
- id: to-celsius
  type: python
  inputs: [sensors]
  class: "edgewise_units:UnitConvert"
  options: {field: value, from: degF, to: degC}
""",
    ("sink", "outbox"): """\
- id: alarms-out
  type: outbox
  inputs: [sensors]
  stream: alarms
  priority: alarm
""",
    ("sink", "mqtt"): """\
- id: local-alarms
  type: mqtt
  inputs: [sensors]
  host: 127.0.0.1
  topic: "alarms/{sensor}"
""",
    ("sink", "webhook"): """\
- id: notify
  type: webhook
  inputs: [sensors]
  url: https://example.com/hooks/edgewise
  bearer_token: change-me
""",
    ("sink", "file"): """\
- id: archive
  type: file
  inputs: [sensors]
  path: readings.ndjson  # relative to the run's data directory
""",
    ("sink", "log"): """\
- id: alarm-log
  type: log
  inputs: [sensors]
  level: WARNING
""",
}
