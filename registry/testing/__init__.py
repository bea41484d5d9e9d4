"""Real-server test harness: local PostgreSQL clusters and a loopback DNS server."""
