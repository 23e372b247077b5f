"""The operator console: status pages, overlay pictures, /metrics and /healthz."""
