"""The xPyD proxy: heartbeat discovery, routing policies, the two legs of a request."""
