"""The building agent: capture, pre-roll, emergency sessions, uplink."""
