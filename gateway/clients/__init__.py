"""Command-line clients of a running gateway (`gateway index add`, `gateway batch submit`): they speak its HTTP API
like any other client and import nothing of the server."""
