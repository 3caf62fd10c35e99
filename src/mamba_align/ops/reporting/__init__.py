"""What a run will cost before it starts (plan) and what it scored after (report): the documents people read."""
