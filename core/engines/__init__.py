"""In-process engines (one per local role): chat now; knowledge and translation later."""
