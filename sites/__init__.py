"""What runs at a site: the Flower ClientApp and the site runtime."""
