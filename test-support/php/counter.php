<?php
// Counts requests per PHP session: the proof that a client stays on the instance holding
// its session. With session.use_strict_mode=1 an id this instance does not know is
// replaced by a new one, so landing on another instance restarts the count at 1.
session_start();
$_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
header('Content-Type: application/json');
echo json_encode([
    'instance' => getenv('INSTANCE_ID'),
    'counter' => $_SESSION['n'],
    'session_id' => session_id(),
    'session_name' => session_name(),
]);
