<?php
// Health check target: always 200 "ok".
header('Content-Type: text/plain');
header('X-Instance-Id: ' . getenv('INSTANCE_ID'));
echo "ok";
