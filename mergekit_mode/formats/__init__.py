"""Output formats: each module is a table of output tensor names plus a config builder."""
