"""Adapters that put das-sd inside generation tools: diffusers pipelines and the host plugins."""
