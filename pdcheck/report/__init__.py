"""What a run reports: the terminal summary (`terminal`) and the run folder's report.html (`html`)."""
