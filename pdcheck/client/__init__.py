"""The client role: requests through the PD path, in process (`legs`: the two legs) or over HTTP (`http`)."""
