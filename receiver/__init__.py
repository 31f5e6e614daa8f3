"""The police side: uplink ingest, durable recordings, live view and web viewer."""
