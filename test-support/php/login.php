<?php
// Mimics LibreEHR's login: keeps the session data but regenerates the session id
// (session_regenerate_id(true)), so the PHP cookie value changes under the client.
session_start();
$old = session_id();
session_regenerate_id(true);
$_SESSION['n'] = ($_SESSION['n'] ?? 0) + 1;
header('Content-Type: application/json');
echo json_encode([
    'instance' => getenv('INSTANCE_ID'),
    'counter' => $_SESSION['n'],
    'old_session_id' => $old,
    'session_id' => session_id(),
    'session_name' => session_name(),
]);
