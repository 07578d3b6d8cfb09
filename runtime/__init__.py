"""Running an edgecm model inside a memory budget: engine, streamer, telemetry."""
