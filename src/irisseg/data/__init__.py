"""Data: synthetic task generator, nnU-Net/MSD dataset reader, episodic and patch sampling."""
