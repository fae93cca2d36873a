"""Data out: forward stored records to message brokers (MQTT, NATS JetStream).

    render    a committed chunk as JSON messages (`render`), topic templates, `record_dicts`
    sender    `QueuedForwarder` (bounded queue, one worker, the shared backoff) and
              `ForwarderSet` (what the group commit calls: ``forward_committed``)
    config    the ``forwarders`` / ``retention`` settings (`data_out_config`, `load_data_out`)
    setup     `build_forwarder`, `forwarders_from_config`, `setup_data_out` (the app wiring,
              which also starts `edgewise.cloud.retention`)
    mqtt      `MqttForwarder` (paho-mqtt)
    nats      `NatsForwarder` (nats-py, JetStream, ``Nats-Msg-Id`` deduplication)

The modules import downwards in that order; nothing here imports the APIs or the app.
"""
