// Buy credits: pay with a saved card or a new one (Stripe Elements), finish 3-D Secure
// with Stripe.js, then watch the payment and the balance until the credits are there.
import {PortalError, getJSON, newKey, postJSON, saveNewCard, say, sleep, stripe, finishPayment} from './portal.js';

const form = document.getElementById('buy-form');
const status = document.getElementById('buy-status');
const button = document.getElementById('buy-button');
const entry = document.getElementById('card-entry');
const balanceNow = document.getElementById('balance-now');
const availableNow = document.getElementById('available-now');
const summary = document.getElementById('buy-summary');
const WATCH_TRIES_MAX = 60;  // about 30 s: then the page says where to look

let client = null;
let card = null;

function usingNewCard() {
  return form.querySelector('input[name="payment_method_id"]:checked')?.hasAttribute('data-new-card') ?? false;
}

function describe() {  // what the button will do, in words
  const pkg = form.querySelector('input[name="package_id"]:checked');
  summary.textContent = pkg ? `You pay once: ${pkg.dataset.label}.` : '';
}

function showCardEntry() {
  const show = usingNewCard();
  entry.hidden = !show;
  if (show && card === null) {
    try {
      client = client ?? stripe();
      card = client.elements().create('card');
      card.mount('#card-element');
    } catch (err) {
      say(status, err.message, 'error');
    }
  }
}

async function watch(paymentId, creditsText, before) {
  for (let i = 0; i < WATCH_TRIES_MAX; i++) {
    const payment = await getJSON(`/portal/payments/${encodeURIComponent(paymentId)}.json`);
    if (payment.status === 'succeeded') {
      const balance = await getJSON('/portal/balance.json');
      if (Number(balance.balance) >= before + Number(payment.credits ?? 0)) {
        balanceNow.textContent = balance.balance_text;
        availableNow.textContent = balance.available_text;
        say(status, `Payment received: ${creditsText} credits added. Balance: ${balance.balance_text} credits.`, 'ok');
        return;
      }
    } else if (['failed', 'canceled', 'requires_payment_method'].includes(payment.status)) {
      throw new PortalError(`the payment did not go through (${payment.status.replaceAll('_', ' ')}); nothing was charged`);
    }
    await sleep(500);
  }
  say(status, 'The payment is still being processed: the credits appear in your balance as soon as it is done.', null);
}

form.addEventListener('change', () => { showCardEntry(); describe(); });
showCardEntry();
describe();

form.addEventListener('submit', async (event) => {
  event.preventDefault();
  button.disabled = true;
  // The purchase's idempotency key: the same for a retry after a lost answer (so it
  // charges once), a new one once the server has answered (the next purchase is new).
  const keyField = form.querySelector('input[name="idempotency_key"]');
  const key = keyField.value;
  const pkg = form.querySelector('input[name="package_id"]:checked');
  const before = Number((await getJSON('/portal/balance.json')).balance);
  try {
    let paymentMethod = form.querySelector('input[name="payment_method_id"]:checked')?.value;
    if (usingNewCard()) {
      say(status, 'Saving your card with Stripe…', null);
      paymentMethod = (await saveNewCard(client ?? stripe(), card, {setDefault: false, key: newKey('portal-card')})).id;
    }
    if (!paymentMethod) throw new PortalError('choose a card');
    say(status, 'Paying…', null);
    let paid;
    try {
      paid = await postJSON('/portal/buy', {package_id: pkg.value, payment_method_id: paymentMethod}, key);
      keyField.value = newKey('portal');
    } catch (err) {
      // A refusal (4xx) charged nothing: the next try is a new purchase. A lost answer or a
      // 5xx may have charged: a retry keeps the key, and the server answers it once.
      if (err instanceof PortalError && err.status >= 400 && err.status < 500) keyField.value = newKey('portal');
      throw err;
    }
    if (paid.status === 'requires_action' && paid.client_secret) {
      say(status, 'Your bank asks you to confirm the payment…', null);
      await finishPayment(client ?? stripe(), paid.client_secret);
    }
    say(status, 'Payment sent; waiting for the credits…', null);
    await watch(paid.payment_id, pkg.dataset.credits, before);
    if (card && typeof card.clear === 'function') card.clear();
  } catch (err) {
    say(status, err instanceof PortalError ? `Not paid: ${err.message}.` : `Something went wrong: ${err.message}`, 'error');
  } finally {
    button.disabled = false;
  }
});
