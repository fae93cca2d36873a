"""Sources: simulator, file replay, MQTT, HTTP ingest, Modbus TCP, OPC UA."""
